# Compiles FILE, which must fail, and checks that the first error names the mistake (EXPECT).
# Usage: cmake -DCXX=... -DINCLUDE=... -DFILE=... -DEXPECT=... -P compile_fail.cmake
execute_process(COMMAND ${CXX} -std=c++20 -fsyntax-only -I${INCLUDE} ${FILE}
                RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
if(result EQUAL 0)
  message(FATAL_ERROR "${FILE} compiled, but it must not")
endif()
string(REGEX MATCH "error: [^\n]*" first_error "${output}")
string(FIND "${first_error}" "${EXPECT}" found)
if(found EQUAL -1)
  message(FATAL_ERROR "the first error does not say \"${EXPECT}\":\n${first_error}\n\nfull output:\n${output}")
endif()
message(STATUS "first error: ${first_error}")
